import random
import unicodedata

import pytest

from speechxfer.errors import InputError, RecipeError
from speechxfer.manifest import Utterance
from speechxfer.text import (PRESETS, UNKNOWN_MARK, TextNormalizer, TextOptions, TextRejected, load_text_options,
                             normalized_references)


def test_turkish_casing_uses_the_locale_table():
    turkish = TextNormalizer(TextOptions(locale="tr"))
    assert turkish("İSTANBUL'DA IĞDIR") == "istanbul'da ığdır"
    assert turkish("Işık İçin") == "ışık için"
    # Azeri shares the dotted/dotless I rule; a region subtag does not hide it.
    assert TextNormalizer(TextOptions(locale="az-Latn"))("İKİ QIZ") == "iki qız"
    # Without the locale, Unicode's default casing: I -> i, İ -> i + COMBINING DOT ABOVE.
    assert TextNormalizer()("IĞDIR") == "iğdir"
    assert TextNormalizer()("İ") == "i\u0307"


def test_turkish_casing_holds_in_decomposed_form():
    nfd = TextNormalizer(TextOptions(locale="tr", unicode_form="NFD"))
    out = nfd("İSTANBUL IĞDIR")
    assert out == unicodedata.normalize("NFD", "istanbul ığdır")
    assert "\u0307" not in out


def test_unicode_form_is_applied():
    decomposed = "c\u030cesky\u0301"  # č and ý written as base letter + combining mark
    assert TextNormalizer(TextOptions(lowercase=False))(decomposed) == "český"
    assert TextNormalizer(TextOptions(unicode_form="NFKC"))("ﬁle ²") == "file 2"
    assert TextNormalizer(TextOptions(unicode_form="NFC"))("ﬁle") == "ﬁle"


def test_punctuation_kept_only_inside_words():
    n = TextNormalizer()
    assert n("L'home, ben-vingut!") == "l'home ben-vingut"
    assert n("'quoted' - text -dash- end.") == "quoted text dash end"
    assert n("one,two;three") == "one two three"
    assert n("well--known") == "well known"
    assert n("100% $5 a+b") == "100 5 a b"  # symbols (S*) go too
    # With nothing to keep, the apostrophe inside a word becomes a word break.
    assert TextNormalizer(TextOptions(keep=""))("l'home") == "l home"


def test_replacements_happen_before_punctuation_removal_in_one_pass():
    n = TextNormalizer(TextOptions(replacements={"’": "'", "&": " and ", "ß": "ss", "ss": "X"}))
    # "’" becomes a kept apostrophe; "ß" -> "ss" is not replaced again by the "ss" rule.
    assert n("L’home & Straße") == "l'home and strasse"
    # Keys are matched after lowercasing.
    assert TextNormalizer(TextOptions(replacements={"a": "b"}))("AAA") == "bbb"


def test_digit_policies():
    text = "Mám 2 kočky a ½ psa"
    assert TextNormalizer()(text) == "mám 2 kočky a ½ psa"
    assert TextNormalizer(TextOptions(digits="drop"))(text) == "mám kočky a psa"
    with pytest.raises(TextRejected, match="2"):
        TextNormalizer(TextOptions(digits="reject"))(text)
    assert TextNormalizer(TextOptions(digits="reject"))("bez čísel") == "bez čísel"
    spell = TextNormalizer(TextOptions(digits="spell", locale="cs"))
    assert spell("Mám 2 kočky") == "mám dva kočky"  # num2words' cardinal, not the grammatical form
    with pytest.raises(TextRejected, match="½"):  # a numeral that is no run of decimal digits is still refused
        spell(text)


def test_digits_spelled_in_the_locale_s_words_before_the_replacements():
    spanish = TextNormalizer(TextOptions(digits="spell", locale="es", replacements={"é": "e", "ñ": "n"}))
    # each run of digits one whole number; separators are punctuation; the table applies to the words (veintitrés)
    assert spanish("Marque 1 para h-323, o 23.") == "marque uno para h trescientos veintitres o veintitres"
    assert spanish("3,5 y 007") == "tres cinco y siete"
    assert spanish("año 2000") == "ano dos mil"
    assert TextNormalizer(TextOptions(digits="spell", locale="it"))("Premi 21") == "premi ventuno"
    # a region subtag in either spelling, and num2words' two-letter fallback
    assert TextNormalizer(TextOptions(digits="spell", locale="pt-BR"))("2") == "dois"
    assert TextNormalizer(TextOptions(digits="spell", locale="de-AT"))("2") == "zwei"
    # other scripts' decimal digits are numbers too
    assert spanish("٣") == "tres"
    # a number too large for the converter stays digits, and the text is rejected (model output keeps it)
    huge = "x " + "9" * 40
    with pytest.raises(TextRejected, match="9"):
        spanish(huge)
    assert spanish(huge, reject=False) == huge
    assert spanish.normalize_all(["Marque 1", "sin", huge, "1"]) == ["marque uno", "sin", None, "uno"]


def test_alphabet_rejects_foreign_characters():
    n = TextNormalizer(TextOptions(alphabet="abcdefghijklmnopqrstuvwxyzçğıöşü"))
    assert n("Çok güzel, l'amour-fou") == "çok güzel l'amour-fou"  # keep characters are allowed
    with pytest.raises(TextRejected, match="ж"):
        n("güzel жена")


def test_model_output_is_normalized_without_rejection():
    n = TextNormalizer(TextOptions(alphabet="abc", digits="reject"))
    with pytest.raises(TextRejected):
        n("Ab 2 жc")
    assert n("Ab, 2 жc!", reject=False) == "ab 2 жc"  # normalized all the same; digits and foreign letters stay
    assert TextNormalizer(TextOptions(digits="drop"))("a 2 b", reject=False) == "a b"


def test_whitespace_collapses():
    assert TextNormalizer(PRESETS["none"])("  Hello,\t World!\u00a0 ") == "Hello, World!"


def test_presets():
    assert PRESETS["basic"] == TextOptions()
    assert TextNormalizer(PRESETS["whisper-basic"])("Don't STOP-now") == "don t stop now"


def test_options_files_are_strict_and_errors_name_the_dotted_key_and_the_file(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("text: {locale: tr, digits: drop, replacements: {'&': ve}}\n", encoding="utf-8")
    assert load_text_options(path) == TextOptions(locale="tr", digits="drop", replacements={"&": "ve"})
    for content, message in [("text: {lower: true}", "unknown key 'text.lower'"),
                             ("lower: true", "unknown key 'lower'"),
                             ("text: {lowercase: 'yes'}", "text.lowercase: expected bool, got str 'yes'"),
                             ("text: {digits: many}", "text.digits must be one of keep, drop, reject, spell"),
                             ("text: {digits: spell}", "text: digits: spell needs locale, the language whose number"),
                             ("text: {digits: spell, locale: xx}",
                              "text: digits: spell: num2words cannot write numbers in the language of locale 'xx'"),
                             ("text: {unicode_form: NFX}", "text.unicode_form must be one of"),
                             ("text: {replacements: {'': x}}", "text.replacements must be a table without an empty"),
                             ("text: {replacements: {a: 1}}", "text.replacements.a: expected str, got int 1")]:
        path.write_text(content + "\n", encoding="utf-8")
        with pytest.raises(RecipeError) as caught:
            load_text_options(path)
        assert str(caught.value).startswith(f"{path}: ") and message in str(caught.value), str(caught.value)


def test_options_built_in_python_are_held_to_the_same_checks():
    with pytest.raises(ValueError, match="digits must be one of keep, drop, reject, spell, got str 'many'"):
        TextOptions(digits="many")
    with pytest.raises(ValueError, match="digits: spell needs locale"):
        TextOptions(digits="spell")
    with pytest.raises(ValueError, match="replacements must be a table without an empty key"):
        TextOptions(replacements={"": "x"})


def test_options_files_that_are_not_utf8_or_repeat_a_key_are_one_line_errors(tmp_path):
    latin1 = tmp_path / "latin1.yaml"
    latin1.write_bytes("text:\n  replacements: {'é': e}\n".encode("latin-1"))
    with pytest.raises(RecipeError) as caught:
        load_text_options(latin1)
    assert str(caught.value) == f"{latin1}:2: not UTF-8 text: byte 0xe9 at offset 24 cannot be decoded (save the " \
                                "file as UTF-8)"
    twice = tmp_path / "twice.yaml"
    twice.write_text("text:\n  locale: tr\n  digits: drop\n  locale: az\n", encoding="utf-8")
    with pytest.raises(RecipeError) as caught:
        load_text_options(twice)
    assert caught.value.line == 4 and "duplicate key 'locale' (first on line 2)" in str(caught.value)


def test_load_text_options_from_preset_or_yaml(tmp_path):
    assert load_text_options("basic") == PRESETS["basic"]
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("base: x\ntext:\n  locale: tr\n  keep: \"'\"\n", encoding="utf-8")
    assert load_text_options(recipe) == TextOptions(locale="tr", keep="'")
    section = tmp_path / "text.yaml"
    section.write_text("digits: reject\n", encoding="utf-8")
    assert load_text_options(section).digits == "reject"
    bad = tmp_path / "bad.yaml"
    bad.write_text("text:\n  digits: [\n", encoding="utf-8")
    with pytest.raises(InputError, match="bad.yaml"):
        load_text_options(bad)
    with pytest.raises(InputError) as caught:
        load_text_options("no-such-preset")
    assert str(caught.value) == ("no-such-preset: neither a normalization preset (none, basic, whisper-basic) nor a "
                                 "YAML file")
    with pytest.raises(InputError) as caught:
        load_text_options(tmp_path)  # `--normalize DIR`: named as the path it is, not quoted inside a sentence
    assert str(caught.value) == (f"{tmp_path}: a folder, not a YAML file of text options or a normalization preset "
                                 "(none, basic, whisper-basic)")


def test_normalize_all_gives_what_each_text_normalized_alone_gives():
    # Texts of characters that casing, Unicode normalization, punctuation and whitespace treat apart, at the edges
    # of texts too (where normalize_all joins them): final sigma, Turkish I, combining marks, Hangul jamo,
    # compatibility forms, digits of several scripts, kept and other marks, every kind of whitespace.
    pieces = ["a", "É", "ΟΔΟΣ", "Σ", "σ", "İ", "I", "ı", "\u0301", "\u0307", "e\u0301", "\u1100", "\u1161", "ﬁ",
              "²", "½", "7", "٣", ",", ".", "'", "-", "’", "«", "$", "©", "_", " ", "  ", "\t", "\u00a0", "\u2028",
              "\u3000", "\x1c", "\r", "ß", "l'home", "well-known", "'quoted'", "x'", "\ud800"]
    rng = random.Random(0)
    texts = ["".join(rng.choices(pieces, k=rng.randint(0, 8))) for _ in range(3000)]
    options = [TextOptions(), TextOptions(locale="tr"), TextOptions(unicode_form="NFD", keep="'"),
               TextOptions(unicode_form="NFKC", digits="drop", replacements={"ß": "ss", "’": "'"}),
               TextOptions(digits="reject", alphabet="abcdefghijklmnopqrstuvwxyzéσςοδ"),
               TextOptions(lowercase=False, remove_punctuation=False), PRESETS["whisper-basic"],
               TextOptions(keep="'-$", replacements={"a": "", "ı": "I"}),
               TextOptions(digits="spell", locale="es", replacements={"é": "e"}),
               TextOptions(unicode_form="NFD", digits="spell", locale="fr", alphabet="abcdefghijklmnopqrstuvwxyz")]
    for option in options:
        normalizer = TextNormalizer(option)

        def alone(text: str) -> str | None:
            try:
                return normalizer(text)
            except TextRejected:
                return None

        assert normalizer.normalize_all(texts) == list(map(alone, texts)), option
        one_by_one = [*texts[:50], "a\nb"]  # a text holding a line feed
        assert normalizer.normalize_all(one_by_one) == list(map(alone, one_by_one))
        # blocks of a few texts, where one thing alone decides a step
        for block in (["ΑΣ", "Σ", "ΑΣ"], ["a\tb", "c"], ["a\u00a0b"], ["a ", "b"], [" a"], ["a", " b"], ["a'", "b"],
                      ["'", "1"], ["a,b", "c"], ["-a-b-"]):
            assert normalizer.normalize_all(block) == list(map(alone, block)), block
        assert normalizer.normalize_all([]) == [] and normalizer.normalize_all([""]) == [""]
    assert TextNormalizer(TextOptions(digits="reject")).normalize_all(["a 1", "b"]) == [None, "b"]


def test_references_that_keep_the_unknown_mark_are_left_out_as_rejected(tmp_path):
    rows = [Utterance(id=i, audio_path="a.wav", text=t, duration_s=1.0, manifest="dev.jsonl", line=k)
            for k, (i, t) in enumerate((("a", "casa"), ("b", f"la {UNKNOWN_MARK} casa"), ("c", "¿qué?")), start=1)]
    references, left_out = normalized_references(rows, TextNormalizer(PRESETS["none"]))
    assert references == {"a": "casa", "c": "¿qué?"}
    assert [(p.path, p.line, p.kind, p.utterance_id) for p in left_out] == [("dev.jsonl", 2, "rejected_text", "b")]
    assert "U+2047" in left_out[0].message
    assert normalized_references(rows, TextNormalizer())[0]["b"] == "la casa"  # basic removes symbols
    assert normalized_references(rows, None)[0]["b"] == f"la {UNKNOWN_MARK} casa"  # unnormalized: no mark in hyps
