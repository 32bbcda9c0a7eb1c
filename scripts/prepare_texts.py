"""Write plain sentence files, one sentence a line, for the synthetic corpora: data/texts/<lang>.txt.

Sources available offline on Debian: the fortune cookies of `fortunes-<lang>` (/usr/share/games/fortunes/<lang>/)
and the HTML pages of `libreoffice-help-<lang>`, fetched with `apt-get download` and unpacked with `dpkg-deb -x`
(nothing is installed). Sentences are kept when speechxfer.synth.is_plain_sentence accepts them for the
language's alphabet and punctuation below and are not left untranslated (the sentences of the en-US help
pages are dropped); they are deduplicated and shuffled with a fixed seed.

    python scripts/prepare_texts.py                       # every language below
    python scripts/prepare_texts.py --languages es it     # a few
"""

from __future__ import annotations

import argparse
import html.parser
import random
import re
import subprocess
import sys
import tempfile
import unicodedata
from collections.abc import Iterator
from pathlib import Path

from speechxfer.synth import is_plain_sentence

LATIN = "abcdefghijklmnopqrstuvwxyz"
# Lowercase letters of each language, loan-word accents included where they are common in running text.
ALPHABETS = {
    "de": LATIN + "äöüß",
    "nl": LATIN + "áéèëêíïóöúü",
    "sv": LATIN + "åäöé",
    "pl": LATIN + "ąćęłńóśźż",
    "cs": LATIN + "áčďéěíňóřšťúůýž",
    "fi": LATIN + "åäöšž",
    "tr": "abcçdefgğhıijklmnoöprsştuüvyzâîûqwx" + "İ",  # İ lowercases to two code points; listed as is
    "ca": LATIN + "àçèéíïòóúü",
    "es": LATIN + "áéíñóúü",
    "it": LATIN + "àèéìíîòóùú",
    "fr": LATIN + "àâæçéèêëîïôœùûüÿ",
    "pt": LATIN + "áâãàçéêíóôõú",
    "ru": "абвгдеёжзийклмнопрстуфхцчшщъыьэюя",
}
COMMON_PUNCTUATION = ".,;:!?'\"-–—…’“”"
PUNCTUATION = {
    "de": "„‚‘«»", "nl": "‘", "sv": "»", "pl": "„«»", "cs": "„‚‘", "fi": "»", "tr": "«»", "ca": "·«»",
    "es": "¡¿«»", "it": "«»", "fr": "«»", "pt": "«»", "ru": "«»„",
}
FORTUNES_DIR = Path("/usr/share/games/fortunes")
# Fortune files in another language than their folder's.
FOREIGN_FORTUNES = {"cs": ("klasik-sk",)}
MIN_WORDS, MAX_WORDS = 4, 20
_SENTENCE_END = re.compile(r"(?<=[.!?…])\s+")
_LEADING_DASHES = re.compile(r"^[-–—\s]+")


def split_sentences(text: str) -> Iterator[str]:
    """Sentences of one paragraph: NFC, whitespace collapsed, split after . ! ? … before a space."""
    text = " ".join(unicodedata.normalize("NFC", text).split())
    for sentence in _SENTENCE_END.split(text):
        sentence = _LEADING_DASHES.sub("", sentence).strip()  # dialogue dashes open many fortunes
        if sentence:
            yield sentence


def fortune_paragraphs(language: str) -> Iterator[str]:
    """Each fortune of /usr/share/games/fortunes/<language>/ as one paragraph, attribution lines dropped."""
    folder = FORTUNES_DIR / language
    if not folder.is_dir():
        return
    foreign = FOREIGN_FORTUNES.get(language, ())
    for path in sorted(folder.iterdir()):
        if path.suffix in (".dat", ".u8") or path.name in foreign or not path.is_file():
            continue
        raw = path.read_bytes()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            text = raw.decode("latin-1")
        for fortune in re.split(r"^%\s*$", text, flags=re.MULTILINE):
            lines = [line for line in fortune.splitlines() if not line.strip().startswith(("--", "—", "―"))]
            yield " ".join(lines)


class _HelpParagraphs(html.parser.HTMLParser):
    """Collects the text of <p class="paragraph..."> elements of one LibreOffice help page."""

    def __init__(self):
        super().__init__()
        self.paragraphs: list[str] = []
        self._depth = 0  # > 0 while inside a wanted <p>
        self._parts: list[str] = []

    def handle_starttag(self, tag, attrs):
        if tag == "p":
            if self._depth:
                self._depth += 1
            elif (dict(attrs).get("class") or "").startswith("paragraph"):
                self._depth, self._parts = 1, []

    def handle_endtag(self, tag):
        if tag == "p" and self._depth:
            self._depth -= 1
            if not self._depth:
                self.paragraphs.append("".join(self._parts))

    def handle_data(self, data):
        if self._depth:
            self._parts.append(data)


def libreoffice_help_paragraphs(language: str, work_dir: Path) -> Iterator[str]:
    """Paragraphs of libreoffice-help-<language>, downloaded into work_dir (nothing installed)."""
    package = f"libreoffice-help-{language.lower()}"
    download = subprocess.run(["apt-get", "download", package], cwd=work_dir, capture_output=True, text=True)
    debs = sorted(work_dir.glob(f"{package}_*.deb"))
    if download.returncode != 0 or not debs:
        print(f"{language}: no {package} ({download.stderr.strip() or 'not downloaded'})", file=sys.stderr)
        return
    unpacked = work_dir / package
    subprocess.run(["dpkg-deb", "-x", str(debs[0]), str(unpacked)], check=True)
    for page in sorted((unpacked / "usr/share/libreoffice/help" / language).rglob("*.html")):
        parser = _HelpParagraphs()
        parser.feed(page.read_text(encoding="utf-8", errors="replace"))
        yield from parser.paragraphs


def plain_sentences(paragraphs: Iterator[str], language: str, *, untranslated: set[str]) -> list[str]:
    """Distinct plain sentences of the paragraphs not in `untranslated`, in order of first appearance."""
    keep = {}
    for paragraph in paragraphs:
        for sentence in split_sentences(paragraph):
            if sentence not in untranslated and is_plain_sentence(sentence, alphabet=ALPHABETS[language],
                                 punctuation=COMMON_PUNCTUATION + PUNCTUATION[language],
                                 min_words=MIN_WORDS, max_words=MAX_WORDS):
                keep.setdefault(sentence, None)
    return list(keep)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--languages", nargs="+", default=list(ALPHABETS), choices=list(ALPHABETS))
    parser.add_argument("--out-dir", default="data/texts")
    parser.add_argument("--seed", type=int, default=0, help="shuffle seed (default 0)")
    args = parser.parse_args(argv)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as work:
        # Translations leave some help paragraphs in English.
        untranslated = {sentence for paragraph in libreoffice_help_paragraphs("en-US", Path(work))
                        for sentence in split_sentences(paragraph)}
        for language in args.languages:
            fortunes = plain_sentences(fortune_paragraphs(language), language, untranslated=untranslated)
            help_pages = plain_sentences(libreoffice_help_paragraphs(language, Path(work)), language,
                                         untranslated=untranslated)
            sentences = list(dict.fromkeys(fortunes + help_pages))
            random.Random(args.seed).shuffle(sentences)
            (out_dir / f"{language}.txt").write_text("".join(s + "\n" for s in sentences), encoding="utf-8")
            print(f"{language}: {len(sentences)} sentences ({len(fortunes)} from fortunes, {len(help_pages)} from "
                  f"LibreOffice help) -> {out_dir / f'{language}.txt'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
