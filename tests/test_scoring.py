import json
import random
import re
import shutil
import subprocess
import tracemalloc

import pytest

from speechxfer.cli import main
from speechxfer.errors import InputError
from speechxfer import scoring
from speechxfer.scoring import align, read_pair, read_transcripts, render_alignment, score
from speechxfer.text import PRESETS, TextNormalizer, TextOptions

# (id, reference, hypothesis): Czech, Turkish and Russian, with substitutions, deletions, insertions,
# an empty hypothesis, shifted words and repeated letters that make character alignments ambiguous.
PAIRS = [
    ("cs_01", "ahoj světe jak se máš", "ahoj svete jak máš dnes"),
    ("cs_02", "česká republika je krásná země", "česká je země krásná země"),
    ("cs_03", "příliš žluťoučký kůň úpěl ďábelské ódy",
     "příliš žlutoučký kůň úpěl ďábelské ódy"),
    ("cs_04", "dobrý den pane profesore", "dobrý den"),
    ("cs_05", "kde je nádraží", "kde je to nádraží prosím"),
    ("cs_06", "v praze padá sníh", ""),
    ("cs_07", "řeka teče pod mostem", "teče řeka pod mostem a"),
    ("cs_08", "to je ono", "to je ono"),
    ("tr_01", "istanbul çok güzel bir şehir", "istanbul cok güzel şehir"),
    ("tr_02", "ışık ve gölge oyunu", "isik ve gölge oyun oyunu"),
    ("tr_03", "bugün hava çok sıcak", "bugün hava sıcak değil mi"),
    ("tr_04", "çay içelim mi", "çay içelim mi"),
    ("tr_05", "ağaçların altında oturduk", "ağaçlar altında oturduk biz"),
    ("tr_06", "kedi köpek kuş", "köpek kuş balık"),
    ("tr_07", "öğretmen öğrencilere ödev verdi", "öğretmen ödev verdi"),
    ("ru_01", "привет как дела", "привет как дела у тебя"),
    ("ru_02", "москва столица россии", "москва столица рассии"),
    ("ru_03", "я люблю читать книги", "люблю читать книги вечером"),
    ("ru_04", "съешь же ещё этих мягких французских булок",
     "съешь ещё этих мягких французских булок да выпей чаю"),
    ("ru_05", "доброе утро", "добрый утро"),
    ("ru_06", "в лесу родилась ёлочка", "в лесу родилась елочка"),
    ("ru_07", "мама мыла раму", "мама мама мыла"),
    ("ru_08", "ааа ббб ааа", "ббб ааа ббб ааа"),
]


def _counts(a):
    return a.hits, a.substitutions, a.deletions, a.insertions


def test_alignment_prefers_hits_like_sclite():
    # A unit-cost alignment calls this two substitutions; sclite (and we) a deletion, a hit and an insertion.
    assert _counts(align(["a", "b"], ["b", "c"])) == (1, 0, 1, 1)
    assert _counts(align(["a", "b", "c"], [])) == (0, 0, 3, 0)
    assert _counts(align([], ["x"])) == (0, 0, 0, 1)
    assert _counts(align(["x", "y"], ["x", "z"])) == (1, 1, 0, 0)
    alignment = align("řeka teče pod mostem".split(), "teče řeka pod mostem a".split())
    assert alignment.ops.count("C") == alignment.hits == 3


def test_score_counts_words_characters_and_sentences():
    refs = {"a": "Jedna dva tři", "b": "čtyři", "c": ""}
    hyps = {"a": "jedna tři čtyři", "b": "čtyři", "c": "pět"}
    report = score(refs, hyps, bootstrap=0)
    # a: Jedna->jedna (S), dva deleted, tři hit, čtyři inserted; b: hit; c: empty reference, one insertion.
    assert (report.hits, report.substitutions, report.deletions, report.insertions) == (2, 1, 1, 2)
    assert report.ref_words == 4 and report.wer == pytest.approx(4 / 4)
    assert report.sentences == 3 and report.sentence_errors == 2
    # Characters of the words, spaces not scored: "Jednadvatři" vs "jednatřičtyři".
    assert report.ref_chars == len("Jednadvatři") + len("čtyři")
    assert report.per_utterance[1].cer == 0.0 and report.per_utterance[2].wer == float("inf")
    assert report.wer_ci95 is None
    lowered = score(refs, hyps, normalizer=TextNormalizer(), bootstrap=0)
    assert lowered.substitutions == 0 and lowered.hits == 3


def test_bootstrap_interval_contains_estimate_and_is_seeded():
    rng = random.Random(0)
    refs, hyps = {}, {}
    for n in range(60):
        words = [rng.choice("abcdefgh") for _ in range(rng.randint(3, 12))]
        refs[f"u{n}"] = " ".join(words)
        hyps[f"u{n}"] = " ".join(w if rng.random() > 0.2 else "x" for w in words if rng.random() > 0.05)
    report = score(refs, hyps, bootstrap=500, seed=1)
    low, high = report.wer_ci95
    assert low < report.wer < high and 0 < high - low < 0.2
    assert report.cer_ci95[0] < report.cer < report.cer_ci95[1]
    assert score(refs, hyps, bootstrap=500, seed=1).wer_ci95 == report.wer_ci95
    assert score(refs, hyps, bootstrap=500, seed=2).wer_ci95 != report.wer_ci95


def test_missing_ids():
    refs = {"a": "x y", "b": "z", "c": "w"}
    hyps = {"a": "x", "c": "w", "d": "extra"}
    with pytest.raises(InputError, match=r"1 reference id without a hypothesis: b; 1 hypothesis id "
                                         r"without a reference: d"):
        score(refs, hyps)
    report = score(refs, hyps, allow_missing=True, bootstrap=0)
    # As sclite: only ids both sides have are scored.
    assert [u.id for u in report.per_utterance] == ["a", "c"]
    assert (report.ref_words, report.deletions) == (3, 1)
    assert report.missing_hypotheses == ("b",) and report.extra_hypotheses == ("d",)


def test_render_alignment():
    alignment = align("ahoj světe jak se máš".split(), "ahoj svete jak máš dnes".split())
    lines = render_alignment(alignment, "ahoj světe jak se máš", "ahoj svete jak máš dnes").splitlines()
    assert lines == ["REF:  ahoj světe jak se máš ****",
                     "HYP:  ahoj svete jak ** máš dnes",
                     "Eval:      S         D      I"]


def _table_align(ref, hyp):
    """sclite's net_dp.c alignment from a whole table in plain Python: (ops, steps where moves tied)."""
    n, m = len(ref), len(hyp)
    cost = [[3 * b for b in range(m + 1)]] + [[3 * a] + [0] * m for a in range(1, n + 1)]
    for a in range(1, n + 1):
        for b in range(1, m + 1):
            cost[a][b] = min(cost[a - 1][b - 1] + (0 if ref[a - 1] == hyp[b - 1] else 4), cost[a - 1][b] + 3,
                             cost[a][b - 1] + 3)
    ops, ties, a, b = [], 0, n, m
    while a or b:
        if a == 0 or b == 0:
            op = "I" if a == 0 else "D"
        else:
            diagonal = cost[a - 1][b - 1] + (0 if ref[a - 1] == hyp[b - 1] else 4)
            deletion, insertion = cost[a - 1][b] + 3, cost[a][b - 1] + 3
            ties += [diagonal, deletion, insertion].count(cost[a][b]) > 1
            if diagonal <= deletion and diagonal <= insertion:
                op = "C" if ref[a - 1] == hyp[b - 1] else "S"
            else:
                op = "D" if deletion < insertion else "I"
        ops.append(op)
        a, b = a - (op != "I"), b - (op != "D")
    return "".join(reversed(ops)), ties


@pytest.mark.parametrize("whole_table_cells", [0, 10**9], ids=["checkpointed", "whole-table"])
def test_alignment_equals_sclites_trace_back_on_ambiguous_pairs(monkeypatch, whole_table_cells):
    # Alphabets of 1-3 tokens make many equally cheap paths; the long-text path (checkpointed rows, the longer
    # text along the rows) must pick the very one sclite's trace back picks, not just one as cheap.
    monkeypatch.setattr(scoring, "_WHOLE_TABLE_CELLS", whole_table_cells)
    rng = random.Random(3)
    ties = 0
    for _ in range(300):
        tokens = ["a", "b", "c"][:rng.randint(1, 3)]
        ref = [rng.choice(tokens) for _ in range(rng.randint(0, 60))]
        hyp = [rng.choice(tokens) for _ in range(rng.randint(0, 60))]
        if rng.random() < 0.3:  # a hypothesis close to its reference, as from a recognizer
            hyp = [t if rng.random() < 0.8 else rng.choice(tokens) for t in ref if rng.random() < 0.9]
        expected, tied = _table_align(ref, hyp)
        ties += tied
        alignment = align(ref, hyp)
        assert alignment.ops == expected, (ref, hyp)
        assert _counts(alignment) == tuple(expected.count(op) for op in "CSDI")
    assert ties > 1000


def test_long_alignment_keeps_memory_small():
    rng = random.Random(0)
    ref = [rng.choice("abcdefgh") for _ in range(3000)]
    hyp = [t if rng.random() < 0.9 else "x" for t in ref if rng.random() < 0.95]
    tracemalloc.start()
    try:
        alignment = align(ref, hyp)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8e6  # the whole table would take 3001 x ~2850 x 8 bytes, 68 MB
    assert alignment.hits + alignment.substitutions + alignment.deletions == len(ref)
    assert alignment.hits + alignment.substitutions + alignment.insertions == len(hyp)
    assert alignment.errors < 0.2 * len(ref)


def test_too_long_utterance_is_refused_naming_it(monkeypatch):
    monkeypatch.setattr(scoring, "MAX_ALIGNMENT_CELLS", 50)
    with pytest.raises(InputError, match=r"^utterance u_2, words: 8 reference x 7 hypothesis tokens "
                                         r"\(5\.6e\+01 cells\) .* split the text into shorter utterances$"):
        score({"u_1": "a b", "u_2": "a b c d e f g h"}, {"u_1": "a c", "u_2": "a b c d e f x"})
    with pytest.raises(InputError, match=r"^utterance u_1, characters: 8 reference x 8 hypothesis tokens"):
        score({"u_1": "abcdefgh"}, {"u_1": "abcdefgx"})
    # Identical texts need no table, however long.
    assert score({"u_1": "a b c d e f g h"}, {"u_1": "a b c d e f g h"}, bootstrap=0).wer == 0


# --- equality with NIST sclite -------------------------------------------------------------------------------

def _write_trn(path, texts):
    # trn: "text (speaker_utterance)"; sclite's spu_id takes the speaker from the part before "_".
    path.write_text("".join(f"{text} ({i})\n" for i, text in texts.items()), encoding="utf-8")


def _sclite_sum(ref_trn, hyp_trn, *, characters=False):
    """(sentences, reference tokens, corr, sub, del, ins, err, sentence errors) from sclite's raw summary."""
    command = ["sctk", "sclite", "-e", "utf-8", "-s", *(["-c"] if characters else []),
               "-r", str(ref_trn), "trn", "-h", str(hyp_trn), "trn", "-i", "spu_id", "-o", "rsum", "stdout"]
    out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    match = re.search(r"\|\s*Sum\s*\|([\d\s]+)\|([\d\s]+)\|", out)
    assert match, out
    return tuple(int(v) for v in (match[1] + match[2]).split())


def _ours(report, *, characters=False):
    if characters:
        counts = (report.char_hits, report.char_substitutions, report.char_deletions, report.char_insertions)
        sentence_errors = sum(1 for u in report.per_utterance if u.chars.errors)
        return (report.sentences, report.ref_chars, *counts, report.char_errors, sentence_errors)
    return (report.sentences, report.ref_words, report.hits, report.substitutions, report.deletions,
            report.insertions, report.word_errors, report.sentence_errors)


needs_sclite = pytest.mark.skipif(shutil.which("sctk") is None, reason="NIST sclite (Debian package sctk) absent")


@needs_sclite
@pytest.mark.parametrize("characters", [False, True], ids=["words", "characters"])
def test_equals_sclite_on_czech_turkish_russian(tmp_path, characters):
    refs = {i: r for i, r, _ in PAIRS}
    hyps = {i: h for i, _, h in PAIRS}
    _write_trn(tmp_path / "ref.trn", refs)
    _write_trn(tmp_path / "hyp.trn", hyps)
    expected = _sclite_sum(tmp_path / "ref.trn", tmp_path / "hyp.trn", characters=characters)
    report = score(refs, hyps, bootstrap=0)
    assert _ours(report, characters=characters) == expected
    assert report.substitutions and report.deletions and report.insertions
    sclite_rate = expected[6] / expected[1]
    assert (report.cer if characters else report.wer) == sclite_rate


@needs_sclite
def test_equals_sclite_on_random_ambiguous_pairs(tmp_path):
    # Few distinct tokens make many equally short alignments: only sclite's weights and tie order decide.
    rng = random.Random(7)
    words = ["да", "нет", "şu", "bu", "že", "ať"]
    refs = {f"r_{n:03d}": " ".join(rng.choice(words) for _ in range(rng.randint(1, 8))) for n in range(300)}
    hyps = {i: " ".join(rng.choice(words) for _ in range(rng.randint(0, 8))) for i in refs}
    _write_trn(tmp_path / "ref.trn", refs)
    _write_trn(tmp_path / "hyp.trn", hyps)
    report = score(refs, hyps, bootstrap=0)
    for characters in (False, True):
        assert _ours(report, characters=characters) == _sclite_sum(tmp_path / "ref.trn", tmp_path / "hyp.trn",
                                                                   characters=characters)


@needs_sclite
def test_allow_missing_equals_sclite(tmp_path):
    refs = {i: r for i, r, _ in PAIRS}
    hyps = {i: h for i, _, h in PAIRS if i not in ("cs_02", "ru_03")}
    _write_trn(tmp_path / "ref.trn", refs)
    _write_trn(tmp_path / "hyp.trn", hyps)
    report = score(refs, hyps, allow_missing=True, bootstrap=0)
    assert _ours(report) == _sclite_sum(tmp_path / "ref.trn", tmp_path / "hyp.trn")
    assert report.missing_hypotheses == ("cs_02", "ru_03")


# --- reading files and the `wer` command ---------------------------------------------------------------------

REFS = {"utt_1": "Dobrý den, pane!", "utt_2": "kde je nádraží", "utt_3": "to je ono"}
HYPS = {"utt_1": "dobrý den pane", "utt_2": "kde nádraží je", "utt_3": ""}


def _write(path, fmt, texts):
    if fmt == "kaldi":
        body = "".join(f"{i} {t}".rstrip() + "\n" for i, t in texts.items())
    elif fmt == "tsv":
        body = "path\tid\ttext\n" + "".join(f"{i}.wav\t{i}\t{t}\n" for i, t in texts.items())
    elif fmt == "jsonl":
        body = "".join(json.dumps({"id": i, "text": t, "audio_path": f"{i}.wav"}, ensure_ascii=False) + "\n"
                       for i, t in texts.items())
    else:
        body = "".join(t + "\n" for t in texts.values())
    path.write_text(body, encoding="utf-8")
    return str(path)


def _wer_json(capsys, *args):
    assert main(["wer", *args, "--json", "--bootstrap", "0"]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("fmt", ["kaldi", "tsv", "jsonl", "lines"])
def test_wer_reads_every_format(tmp_path, capsys, fmt):
    suffix = {"jsonl": ".jsonl", "tsv": ".tsv"}.get(fmt, ".txt")
    ref = _write(tmp_path / f"ref{suffix}", fmt, REFS)
    hyp = _write(tmp_path / f"hyp{suffix}", fmt, HYPS)
    expected = score(REFS, HYPS, normalizer=TextNormalizer(), bootstrap=0).to_dict()
    summary = _wer_json(capsys, ref, hyp, "--normalize", "basic")
    assert (summary["ref_format"], summary["hyp_format"]) == (fmt, fmt)
    assert {k: summary[k] for k in expected} == expected
    # utt_2: "je" deleted before "nádraží" and inserted after it; utt_3: three deletions.
    assert (summary["wer"], summary["deletions"], summary["insertions"]) == (5 / 9, 4, 1)
    assert _wer_json(capsys, ref, hyp, "--normalize", "basic", "--format", fmt)["wer"] == summary["wer"]


def test_wer_pairs_by_id_not_by_order(tmp_path, capsys):
    ref = _write(tmp_path / "ref.txt", "kaldi", REFS)
    hyp = _write(tmp_path / "hyp.jsonl", "jsonl", dict(reversed(list(HYPS.items()))))
    assert _wer_json(capsys, ref, hyp)["sentences"] == 3
    assert _wer_json(capsys, ref, hyp)["wer"] == score(REFS, HYPS, bootstrap=0).wer


def test_wer_normalize_from_yaml_applies_to_both_sides(tmp_path, capsys):
    ref = _write(tmp_path / "ref.txt", "kaldi", {"u_1": "IŞIK & Gölge"})
    hyp = _write(tmp_path / "hyp.txt", "kaldi", {"u_1": "ışık ve gölge"})
    recipe = tmp_path / "tr.yaml"
    recipe.write_text("base: x\ntext:\n  locale: tr\n  replacements: {'&': ' ve '}\n", encoding="utf-8")
    assert _wer_json(capsys, ref, hyp, "--normalize", str(recipe))["wer"] == 0.0
    assert _wer_json(capsys, ref, hyp, "--normalize", "basic")["wer"] > 0


def test_wer_outputs_per_utterance_worst_and_interval(tmp_path, capsys):
    ref = _write(tmp_path / "ref.txt", "kaldi", REFS)
    hyp = _write(tmp_path / "hyp.txt", "kaldi", HYPS)
    table = tmp_path / "per_utt.tsv"
    assert main(["wer", ref, hyp, "--normalize", "basic", "--per-utterance", str(table), "--worst", "1"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"WER 55\.56% \[5 / 9 words: 0 sub, 4 del, 1 ins, 5 hits\]\s+95% CI \[", out)
    assert "SER 66.67% [2 / 3 sentences]" in out
    assert "utt_3: WER 100.00%" in out and "HYP:  ** ** ***" in out
    rows = [line.split("\t") for line in table.read_text(encoding="utf-8").splitlines()]
    assert rows[0][:7] == ["id", "ref_words", "hits", "substitutions", "deletions", "insertions", "wer"]
    assert rows[1] == ["utt_1", "3", "3", "0", "0", "0", "0.000000", "12", "0", "0.000000", "dobrý den pane",
                       "dobrý den pane"]
    assert rows[3][0] == "utt_3" and rows[3][-1] == ""


def test_wer_missing_ids_exit_2_or_scored_with_allow_missing(tmp_path, capsys):
    ref = _write(tmp_path / "ref.txt", "kaldi", REFS)
    hyp = _write(tmp_path / "hyp.txt", "kaldi", {"utt_1": "dobrý den pane", "utt_9": "navíc"})
    assert main(["wer", ref, hyp]) == 2
    err = capsys.readouterr().err
    assert "2 reference ids without a hypothesis: utt_2, utt_3" in err and "utt_9" in err
    assert f"(references: {ref}, hypotheses: {hyp})" in err
    summary = _wer_json(capsys, ref, hyp, "--allow-missing")
    assert summary["sentences"] == 1
    assert summary["missing_hypotheses"] == ["utt_2", "utt_3"] and summary["extra_hypotheses"] == ["utt_9"]
    # no id in common, even allowing missing ones: both files named
    other = _write(tmp_path / "other.txt", "kaldi", {"utt_8": "navíc"})
    assert main(["wer", ref, other, "--allow-missing"]) == 2
    assert capsys.readouterr().err == ("speechxfer wer: error: no utterance id appears in both the references and "
                                       f"the hypotheses (references: {ref}, hypotheses: {other})\n")
    empty = _write(tmp_path / "empty.txt", "kaldi", {"utt_1": "", "utt_2": ""})
    assert main(["wer", empty, empty, "--allow-missing"]) == 2
    assert capsys.readouterr().err == f"speechxfer wer: error: {empty}: the references hold no words, so WER is " \
                                      "undefined\n"


def test_kaldi_line_without_text_is_an_empty_hypothesis(tmp_path):
    path = tmp_path / "hyp.txt"
    path.write_text("utt_1 a b\nutt_2\n\nutt_3   \n", encoding="utf-8")
    assert read_transcripts(path) == ({"utt_1": "a b", "utt_2": "", "utt_3": ""}, "kaldi")


@pytest.mark.parametrize("name, body, fmt, message", [
    ("bad.jsonl", '{"id": "a", "text": "x"}\n{"id": "b", "text": \n', "auto", r"bad\.jsonl:2: not valid JSON"),
    ("bad.jsonl", '{"id": "a", "text": "x"}\n{"id": "b"}\n', "auto", r"bad\.jsonl:2: expected a string 'text'"),
    ("dup.txt", "u1 a\nu2 b\nu1 c\n", "kaldi", r"dup\.txt:3: duplicate utterance id 'u1'"),
    ("short.tsv", "id\ttext\nu1\ta\nu2\n", "auto", r"short\.tsv:3: expected 2 tab-separated columns"),
    ("nohead.tsv", "u1\ta\n", "tsv", r"nohead\.tsv:1: the header must name 'id' and 'text'"),
])
def test_bad_transcript_files_name_file_and_line(tmp_path, name, body, fmt, message):
    path = tmp_path / name
    path.write_text(body, encoding="utf-8")
    with pytest.raises(InputError, match=message):
        read_transcripts(path, format=fmt)


def test_bad_files_through_the_command(tmp_path, capsys):
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("u1 a\nu2 ž\n".encode("utf-8") + "u3 é\n".encode("latin-1"))
    ref = _write(tmp_path / "ref.txt", "kaldi", REFS)
    assert main(["wer", ref, str(latin1)]) == 2
    assert re.search(r"latin1\.txt:3: not UTF-8", capsys.readouterr().err)
    plain = _write(tmp_path / "plain.txt", "lines", {"a": "one line"})
    assert main(["wer", ref, plain]) == 2
    assert "other file has utterance ids" in capsys.readouterr().err
    lines_ref = _write(tmp_path / "lines_ref.txt", "lines", REFS)
    assert main(["wer", lines_ref, plain]) == 2
    assert "3 lines and the hypotheses 1" in capsys.readouterr().err


def test_read_pair_pairs_plain_files_by_line(tmp_path):
    ref = _write(tmp_path / "ref.txt", "lines", {"a": "one two", "b": "", "c": "three"})
    hyp = _write(tmp_path / "hyp.txt", "lines", {"a": "one", "b": "x", "c": "three"})
    refs, hyps, ref_format, hyp_format = read_pair(ref, hyp)
    assert (ref_format, hyp_format) == ("lines", "lines")
    assert refs == {"1": "one two", "2": "", "3": "three"} and hyps["2"] == "x"


def test_a_rejected_reference_is_an_input_error_and_a_hypothesis_is_never_rejected():
    digits = TextNormalizer(TextOptions(digits="reject"))
    with pytest.raises(InputError, match="utterance a: the normalizer rejects the reference"):
        score({"a": "1"}, {"a": "one"}, normalizer=digits)
    # model output is scored, never refused: what the normalizer would reject stays, and counts as an error
    report = score({"a": "One two"}, {"a": "one 2"}, normalizer=digits, bootstrap=0)
    assert report.per_utterance[0].hypothesis == "one 2" and (report.hits, report.substitutions) == (1, 1)
    report = score({"a": "abc"}, {"a": "Abc, ж"}, normalizer=TextNormalizer(TextOptions(alphabet="abc")), bootstrap=0)
    assert report.per_utterance[0].hypothesis == "abc ж" and (report.hits, report.insertions) == (1, 1)


def test_an_unknown_token_is_one_wrong_character_and_never_a_word():
    refs = {"a": "Hola casa", "b": "casa"}
    hyps = {"a": "[UNK]ola ca<unk>a", "b": "[UNK]"}
    mark = scoring.UNKNOWN_MARK
    # with an alphabet that lacks u, n and k, as without one: "[UNK]" is neither rejected nor the word "unk"
    for options in (TextOptions(alphabet="achlos"), TextOptions()):
        report = score(refs, hyps, normalizer=TextNormalizer(options), bootstrap=0)
        assert [u.hypothesis for u in report.per_utterance] == [f"{mark}ola ca{mark}a", mark]
        assert (report.hits, report.substitutions, report.deletions, report.insertions) == (0, 3, 0, 0)
        a, b = report.per_utterance
        assert (a.chars.substitutions, a.chars.errors) == (2, 2)  # one character each
        assert (b.chars.substitutions, b.chars.deletions) == (1, 3)
    assert score({"a": "unk"}, {"a": "[UNK]"}, normalizer=TextNormalizer(), bootstrap=0).wer == 1.0
    assert score(refs, hyps, bootstrap=0).per_utterance[1].hypothesis == "[UNK]"  # no normalizer: as written


def test_a_reference_that_keeps_the_unknown_mark_is_refused_not_matched(tmp_path, capsys):
    # The `none` preset keeps symbols: a reference "⁇" would be a hit for the model's unknown token.
    mark, none = scoring.UNKNOWN_MARK, TextNormalizer(PRESETS["none"])
    refs, hyps = {"a": "casa", "b": f"la {mark} casa"}, {"a": "casa", "b": "la [UNK] casa"}
    with pytest.raises(InputError, match=rf"utterance b: the normalizer rejects the reference: text holds {mark} "
                                         r"\(U\+2047\)"):
        score(refs, hyps, normalizer=none, bootstrap=0)
    report = score(refs, hyps, normalizer=TextNormalizer(), bootstrap=0)  # basic removes it: an insertion
    assert (report.hits, report.insertions) == (3, 1)
    assert score(refs, hyps, bootstrap=0).substitutions == 1  # as written: "[UNK]" stays, never the mark
    (tmp_path / "ref.txt").write_text(f"u-1 casa\nu-2 la {mark} casa\n", encoding="utf-8")
    (tmp_path / "hyp.txt").write_text("u-1 casa\nu-2 la <unk> casa\n", encoding="utf-8")
    assert main(["wer", str(tmp_path / "ref.txt"), str(tmp_path / "hyp.txt"), "--normalize", "none"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith(f"speechxfer wer: error: {tmp_path / 'ref.txt'}:2: utterance u-2: "
                                               "the normalizer rejects")


@pytest.mark.parametrize("fmt, body, line", [
    ("kaldi", "u-1 casa\n\nu-2 casa 7\n", 3),
    ("tsv", "id\ttext\nu-1\tcasa\nu-2\tcasa 7\n", 3),
    ("jsonl", '{"id": "u-1", "text": "casa"}\n{"id": "u-2", "text": "casa 7"}\n', 2),
    ("lines", "casa\n\ncasa 7\n", 3),
], ids=["kaldi", "tsv", "jsonl", "lines"])
def test_wer_names_the_file_and_line_of_a_rejected_reference(tmp_path, capsys, fmt, body, line):
    # a manifest is one of the JSONL forms: its extra fields do not matter
    ref = tmp_path / ("ref.jsonl" if fmt == "jsonl" else f"ref.{fmt}")
    ref.write_text(body, encoding="utf-8")
    hyp = tmp_path / "hyp.txt"
    hyp.write_text("u-1 casa\nu-2 casa\n" if fmt != "lines" else "casa\n\ncasa\n", encoding="utf-8")
    digits = tmp_path / "digits.yaml"
    digits.write_text("text:\n  digits: reject\n", encoding="utf-8")
    assert main(["wer", str(ref), str(hyp), "--normalize", str(digits)]) == 2
    utterance = "3" if fmt == "lines" else "u-2"
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "'casa 7'" in err
    assert err.startswith(f"speechxfer wer: error: {ref}:{line}: utterance {utterance}: the normalizer rejects the "
                          "reference: ")
    # outside the alphabet: the same place
    alphabet = tmp_path / "alphabet.yaml"
    alphabet.write_text("text:\n  alphabet: acs\n", encoding="utf-8")
    ref.write_text(body.replace("casa 7", "casa ñ"), encoding="utf-8")
    assert main(["wer", str(ref), str(hyp), "--normalize", str(alphabet)]) == 2
    assert capsys.readouterr().err.startswith(f"speechxfer wer: error: {ref}:{line}: utterance {utterance}: ")



def test_alignment_never_beats_jiwers_minimum_edit_distance():
    # jiwer's unit-cost alignment gives the least possible number of errors; sclite's weighted one may trade a
    # substitution for a deletion plus an insertion, never fewer errors, and both account for every reference word.
    import jiwer

    rng = random.Random(7)
    words = "a b c d e ž ш ı".split()
    more = 0
    for _ in range(300):
        ref = [rng.choice(words) for _ in range(rng.randint(1, 9))]
        hyp = [rng.choice(words) for _ in range(rng.randint(0, 9))]
        ours = align(ref, hyp)
        theirs = jiwer.process_words(" ".join(ref), " ".join(hyp) or "")
        assert ours.hits + ours.substitutions + ours.deletions == len(ref)
        ours_errors = ours.substitutions + ours.deletions + ours.insertions
        jiwer_errors = theirs.substitutions + theirs.deletions + theirs.insertions
        assert ours_errors >= jiwer_errors
        more += ours_errors > jiwer_errors
    assert more > 0  # the two really differ on some pairs, which is why jiwer alone cannot give sclite's numbers


def test_wer_refuses_a_line_too_long_to_align_in_one_line(tmp_path, capsys):
    words = [f"w{n % 997}" for n in range(40_000)]
    ref = _write(tmp_path / "ref.txt", "kaldi", {"utt_1": "short line", "utt_2": " ".join(words)})
    hyp = _write(tmp_path / "hyp.txt", "kaldi", {"utt_1": "short line", "utt_2": " ".join(words[1:] + ["x"])})
    assert main(["wer", ref, hyp, "--bootstrap", "0"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith(f"speechxfer wer: error: {ref}:2: utterance utt_2, words: 40,000 reference x 40,000 "
                          "hypothesis tokens (1.6e+09 cells)")
    assert "split the text into shorter utterances" in err


@pytest.mark.parametrize("fmt, body", [
    ("kaldi", "utt_1 a b\nutt_2 c\n"),
    ("tsv", "id\ttext\nutt_1\ta b\n"),
    ("jsonl", '{"id": "utt_1", "text": "a b"}\n'),
    ("lines", "a b\nc\n"),
])
def test_byte_order_mark_is_not_part_of_the_first_line(tmp_path, fmt, body):
    # .txt files: the format must be recognized through the mark too.
    (tmp_path / "plain.txt").write_text(body, encoding="utf-8")
    (tmp_path / "marked.txt").write_text(body, encoding="utf-8-sig")
    assert (tmp_path / "marked.txt").read_bytes().startswith(b"\xef\xbb\xbf")
    assert read_transcripts(tmp_path / "marked.txt") == read_transcripts(tmp_path / "plain.txt")
    assert read_transcripts(tmp_path / "marked.txt")[1] == fmt
