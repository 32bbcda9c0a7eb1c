"""Text normalization for training targets and scoring alike, driven by options rather than by language.

The steps, in order: Unicode normalization form; locale-aware lowercasing (a casing table keyed by locale, then
``str.lower``); numbers spelled out under ``digits: spell``; the replacement table; the digits policy; removal of
punctuation and symbols (Unicode categories P* and S*), where characters in ``keep`` survive only between two word
characters; the alphabet check; whitespace collapse.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence
import re
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from speechxfer.config import Check, check_fields, checked, from_mapping, read_yaml
from speechxfer.errors import InputError, Problem
from speechxfer.manifest import Utterance

# Lowercasing exceptions that str.lower() gets wrong for a locale, keyed by language subtag. Multi-character
# keys come first at use time, so a decomposed "I" + COMBINING DOT ABOVE (NFD of "İ") lowers to "i", not "ı̇".
CASING_TABLES: dict[str, dict[str, str]] = {
    "tr": {"I\u0307": "i", "İ": "i", "I": "ı"},
    "az": {"I\u0307": "i", "İ": "i", "I": "ı"},
}


@dataclass(frozen=True)
class TextOptions:
    """How to normalize text: the `text:` section of a recipe."""

    unicode_form: Literal["NFC", "NFKC", "NFD", "NFKD"] = "NFC"  # applied first, and again after casing
    lowercase: bool = True
    locale: str | None = None  # casing locale such as "tr" or "az-Latn" (I→ı, İ→i); None: Unicode default casing
    keep: str = "'-"  # punctuation kept when it stands between two word characters (l'home, well-known)
    # after form and casing, before punctuation removal
    replacements: dict[str, str] = checked(default_factory=dict,
                                           check=Check(lambda v: "" not in v, "a table without an empty key"))
    # numbers (Unicode N*): keep, delete, reject the text, or spell each run of decimal digits as the number it writes
    # in the words of `locale`'s language (num2words: "marque 1" -> "marque uno"), rejecting other numerals (½, Ⅻ)
    digits: Literal["keep", "drop", "reject", "spell"] = "keep"
    alphabet: str | None = None  # when set, characters outside it, `keep` and the space make the text rejected
    remove_punctuation: bool = True  # False keeps P* and S* characters as they are (the "none" preset)

    def __post_init__(self):
        check_fields(self)
        if self.digits == "spell":
            number_speller(self.locale)  # a locale num2words cannot spell is refused when the options are made


# What scoring.normalize_hypothesis makes of the model's unknown token: one character, so that CER counts one
# unknown character as one error, and a symbol, which punctuation removal takes out of every reference (sentencepiece
# spells its unknown piece the same way). A reference that keeps it (the `none` preset keeps symbols) is refused
# (normalized_reference): there the unknown token would score as a hit.
UNKNOWN_MARK = "\u2047"  # ⁇


class TextRejected(ValueError):
    """A text the options refuse: digits under `digits: reject`, or characters outside the alphabet."""


class TextNormalizer:
    """Callable that normalizes one text according to TextOptions."""

    def __init__(self, options: TextOptions = TextOptions()):
        self.options = options
        form = options.unicode_form
        language = (options.locale or "").replace("_", "-").split("-")[0].lower()
        casing = CASING_TABLES.get(language, {}) if options.lowercase else {}
        self._casing = _multi_replacer(casing)
        self._spell = number_speller(options.locale, form) if options.digits == "spell" else None
        self._replace = _multi_replacer({unicodedata.normalize(form, k): unicodedata.normalize(form, v)
                                         for k, v in options.replacements.items()})
        self._keep = frozenset(unicodedata.normalize(form, options.keep))
        self._alphabet = (None if options.alphabet is None
                          else frozenset(unicodedata.normalize(form, options.alphabet)) | self._keep | {" "})
        # normalize_all joins texts with line feeds: a table that holds one could look across or add one
        self._joinable = not any("\n" in k + v for table in (casing, options.replacements) for k, v in table.items())

    def __call__(self, text: str, *, reject: bool = True) -> str:
        """Return the normalized text (single spaces, no leading or trailing space); raises TextRejected.

        reject=False, for model output (scored, never left out: see scoring.normalize_hypothesis): digits under
        `digits: reject` and characters outside the alphabet stay as they are instead."""
        options = self.options
        text = unicodedata.normalize(options.unicode_form, text)
        if options.lowercase:
            text = unicodedata.normalize(options.unicode_form, self._casing(text).lower())
        if self._spell is not None:
            text = self._spell(text)
        text = self._replace(text)
        if options.digits == "drop":
            text = "".join(c for c in text if unicodedata.category(c)[0] != "N")
        elif options.digits in ("reject", "spell") and reject:
            numbers = [c for c in text if unicodedata.category(c)[0] == "N"]
            if numbers:
                raise TextRejected(f"text holds digits {''.join(dict.fromkeys(numbers))!r}: {text!r}")
        if options.remove_punctuation:
            text = self._strip_punctuation(text)
        text = " ".join(text.split())
        if reject and self._alphabet is not None:
            outside = [c for c in text if c not in self._alphabet]
            if outside:
                raise TextRejected(f"characters outside the alphabet {''.join(dict.fromkeys(outside))!r}: {text!r}")
        return text

    def normalize_all(self, texts: Sequence[str]) -> list[str | None]:
        """What __call__ gives each of `texts`, None where it rejects one: a million training texts in seconds.

        They are normalized at once, joined by line feeds, which no step changes, joins to a neighbour or looks
        across: Unicode normalization and casing (the final sigma's too) stop at one, no casing table or
        replacement holds one, it is neither a mark nor a word character, and whitespace collapse keeps it. So each
        step runs in C over the lot (a str method, or a pattern that starts at the characters it changes), and
        only rejection looks at each text (of a block holding a digit, or a character outside the alphabet). Texts
        of which one holds a line feed itself are normalized one by one."""
        joined = "\n".join(texts)
        if not self._joinable or joined.count("\n") != len(texts) - 1:
            return list(map(self._or_none, texts))
        options = self.options
        text = unicodedata.normalize(options.unicode_form, joined)
        del joined
        if options.lowercase:
            text = unicodedata.normalize(options.unicode_form, self._casing(text).lower())
        if self._spell is not None:
            text = self._spell(text)
        text = self._replace(text)
        chars = _distinct(text)  # from here on, characters only go (or become spaces)
        numbers = [c for c in chars if unicodedata.category(c)[0] == "N"]
        rejected: list[int] = []  # positions of the texts rejected
        if numbers and options.digits == "drop":
            text = _replaced(text, numbers, "")
        elif numbers and options.digits in ("reject", "spell"):  # under spell: numerals other than digit runs
            pieces = text.split("\n")
            found = _any_of(numbers)
            rejected = [k for k, piece in enumerate(pieces) if found.search(piece)]
            for k in rejected:
                pieces[k] = ""  # the rest go on
            text = "\n".join(pieces)
        marks = {c for c in chars if unicodedata.category(c)[0] in "PS"}
        if options.remove_punctuation and marks:
            # as _strip_punctuation: each mark becomes a space, unless kept with a word character on both sides
            text = _replaced(text, marks - self._keep, " ")
            if marks & self._keep:
                kept, word = _any_of(marks & self._keep).pattern, list(filter(_is_word_char, chars))
                if word:  # a kept mark, then: no word character before it, or none after it
                    word = _any_of(word).pattern
                    kept = f"{kept}(?:(?<!{word}.)|(?!{word}))"
                text = re.sub(kept, " ", text)
        # as " ".join(text.split()) of each: every whitespace character a space (str.isspace is str.split's test),
        # then each run of spaces one, none at either end
        text = _replaced(text, [c for c in chars if c.isspace() and c not in " \n"], " ")
        while "  " in text:
            text = text.replace("  ", " ")
        pieces = text.split("\n")
        if text[:1] == " " or text[-1:] == " " or " \n" in text or "\n " in text:
            pieces = list(map(str.strip, pieces))
        if len(pieces) != len(texts):  # a step made or removed a line feed after all: one by one
            return list(map(self._or_none, texts))
        outside = [] if self._alphabet is None else [c for c in chars if c not in self._alphabet and c != "\n"]
        if outside:
            found = _any_of(outside)
            rejected += [k for k, piece in enumerate(pieces) if found.search(piece)]
        for k in rejected:
            pieces[k] = None
        return pieces

    def _or_none(self, text: str) -> str | None:
        try:
            return self(text)
        except TextRejected:
            return None

    def _strip_punctuation(self, text: str) -> str:
        # Removed characters become spaces, so "one,two" stays two words; a kept character survives only with
        # word characters on both sides, so "l'home" keeps its apostrophe and "'quoted'" loses both.
        if text.replace(" ", "").isalpha():  # letters and spaces only, the common case: decided in C
            return text
        marks = {c for c in set(text) if unicodedata.category(c)[0] in "PS"}
        if marks.isdisjoint(self._keep):  # no character to look around: each mark becomes a space
            return text.translate({ord(c): " " for c in marks})
        out = []
        for i, c in enumerate(text):
            if unicodedata.category(c)[0] not in "PS":
                out.append(c)
            elif (c in self._keep and 0 < i < len(text) - 1
                  and _is_word_char(text[i - 1]) and _is_word_char(text[i + 1])):
                out.append(c)
            else:
                out.append(" ")
        return "".join(out)


_DIGIT_RUN = re.compile(r"\d+")  # a run of Unicode decimal digits (Nd), any script's


def number_speller(locale: str | None, unicode_form: str = "NFC") -> Callable[[str], str]:
    """A function that writes each run of decimal digits in a text as words of `locale`'s language, through the
    num2words library ("marque 1 o 21" -> "marque uno o veintiuno" for es), in `unicode_form`: the run is read as
    one whole number, so separators stay punctuation ("3,5" -> "tres cinco" once punctuation goes) and leading zeros
    go. A number too large for the language's converter stays digits (and is rejected). ValueError when `locale` is
    None or num2words has no converter for it (it tries the locale, e.g. pt_BR, then its two-letter language)."""
    if locale is None:
        raise ValueError("digits: spell needs locale, the language whose number words to write (e.g. locale: es)")
    from num2words import CONVERTER_CLASSES, num2words

    lang = locale.replace("-", "_")
    if lang not in CONVERTER_CLASSES and lang.split("_")[0].lower()[:2] not in CONVERTER_CLASSES:
        raise ValueError(f"digits: spell: num2words cannot write numbers in the language of locale {locale!r}; it "
                         f"knows {', '.join(sorted(CONVERTER_CLASSES))}")

    def spell(match: re.Match) -> str:
        try:
            words = num2words(int(match.group()), lang=lang)
        except (OverflowError, NotImplementedError, ValueError, IndexError, KeyError):
            return match.group()  # too large for the language's converter: left as digits, so the text is rejected
        return f" {words.lower()} "

    def speller(text: str) -> str:
        if not any(c.isdigit() for c in text):
            return text
        return unicodedata.normalize(unicode_form, _DIGIT_RUN.sub(spell, text))

    return speller


def _is_word_char(c: str) -> bool:
    return unicodedata.category(c)[0] in "LMN"


def code_points(text: str) -> np.ndarray:
    """The code point of each character of `text` (characters,): uint8 when it is ASCII (a quarter of the memory
    and the time), else uint32; a lone surrogate, which JSON can spell, is one character too."""
    if text.isascii():
        return np.frombuffer(text.encode("ascii"), dtype=np.uint8)
    return np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)


def _distinct(text: str) -> list[str]:
    """The characters `text` holds, each once, in code-point order: counted by numpy (a set of a long text's
    characters is built a character at a time)."""
    return list(map(chr, np.flatnonzero(np.bincount(code_points(text))).tolist()))


def _replaced(text: str, chars: Iterable[str], by: str) -> str:
    """`text` with each of `chars` replaced by `by`: a str.replace for each (a fast search in C), not a pattern
    tried at every character."""
    for c in chars:
        text = text.replace(c, by)
    return text


def _any_of(chars: Iterable[str]) -> re.Pattern:
    """A pattern that matches any one of `chars`."""
    return re.compile("[" + "".join(map(re.escape, chars)) + "]")


def _multi_replacer(table: dict[str, str]):
    """A function replacing every key of `table` in one left-to-right pass, longest key first."""
    if not table:
        return lambda text: text
    pattern = re.compile("|".join(re.escape(k) for k in sorted(table, key=len, reverse=True)))
    return lambda text: pattern.sub(lambda m: table[m.group()], text)


PRESETS: dict[str, TextOptions] = {
    # Only Unicode NFC and whitespace collapse: score exactly what was written.
    "none": TextOptions(lowercase=False, remove_punctuation=False),
    # NFC, lowercase, punctuation and symbols removed except apostrophes and hyphens inside words.
    "basic": TextOptions(),
    # Like Whisper's BasicTextNormalizer: NFKC, lowercase, every punctuation mark and symbol removed
    # (Whisper also drops text in brackets and combining marks; this does not).
    "whisper-basic": TextOptions(unicode_form="NFKC", keep=""),
}


def load_text_options(spec: str | os.PathLike) -> TextOptions:
    """A preset name, or a YAML file whose `text:` section (or, without one, whole content) holds TextOptions.

    Raises InputError for a name that is neither; RecipeError (an InputError) naming the file and the dotted key
    for a file that cannot be read or holds a bad key or value."""
    if isinstance(spec, str) and spec in PRESETS:
        return PRESETS[spec]
    path = Path(spec)
    if path.is_dir():
        raise InputError(f"a folder, not a YAML file of text options or a normalization preset "
                         f"({', '.join(PRESETS)})", path=spec)
    if not path.is_file():
        raise InputError(f"neither a normalization preset ({', '.join(PRESETS)}) nor a YAML file", path=spec)
    content = read_yaml(path, what="text options")
    prefix = ""
    if isinstance(content, dict) and "text" in content:
        content, prefix = content["text"], "text."
    return from_mapping(TextOptions, {} if content is None else content, path=path, prefix=prefix)


def normalized_reference(text: str, normalizer: Callable[[str], str] | None) -> str:
    """A reference as it is scored: normalized (None: as it is). TextRejected when the normalizer rejects it, or
    when it still holds UNKNOWN_MARK, the mark scoring.normalize_hypothesis gives the model's unknown token."""
    if normalizer is None:  # hypotheses are then scored as they are too: an unknown token never becomes the mark
        return text
    text = normalizer(text)
    if UNKNOWN_MARK in text:
        raise TextRejected(f"text holds {UNKNOWN_MARK} (U+2047), the mark a model's unknown token is scored as "
                           f"(choose a normalization that removes symbols, or replace it): {text!r}")
    return text


def normalized_references(utterances: Iterable[Utterance], normalizer: Callable[[str], str] | None
                          ) -> tuple[dict[str, str], list[Problem]]:
    """{utterance id: normalized reference} of the utterances whose reference can be scored, and a Problem (naming
    the manifest and line) for each one left out: a reference the normalizer rejects (`rejected_text`: digits under
    `digits: reject`, characters outside the alphabet) or leaves empty (`empty_text`). The one rule by which train
    (dev and test), evaluate and lm tune leave rows out and count them instead of stopping at the first.
    """
    references: dict[str, str] = {}
    left_out: list[Problem] = []
    for u in utterances:
        try:
            text = normalized_reference(u.text, normalizer)
        except TextRejected as err:
            left_out.append(Problem(u.manifest or u.audio_path, u.line, "rejected_text",
                                    f"utterance {u.id}: the normalizer rejects the reference: {err}", u.id))
            continue
        if not text.strip():
            left_out.append(Problem(u.manifest or u.audio_path, u.line, "empty_text",
                                    f"utterance {u.id}: the reference is empty after normalization", u.id))
            continue
        references[u.id] = text
    return references, left_out
